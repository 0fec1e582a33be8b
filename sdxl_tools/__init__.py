"""Build and operations tools around the SDXL artifact: packaging, registry + gate, batch job, Spark,
clients, random-weight builders. They import the runtime (``model_pkg``); it never imports them, and
none of this package is shipped inside the artifact."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout the tools run from
TEMPLATE = ROOT / "MLmodel_template"  # the artifact's requirements, input example, model card, styles
VARIANTS = ("all", "fp16", "fp32")  # which weight files a build packages (``build --variant``)
