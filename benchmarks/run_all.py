#!/usr/bin/env python
"""Run every benchmark, print one table, write benchmarks/RESULTS.md and benchmarks/ratios.png.

  python benchmarks/run_all.py [--repeats 7]      (make bench)

Every figure is a ratio of two things measured side by side in this run on this machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

from benchmarks.bench_core import Ratio, environment, fullsize_sharing_ratio  # noqa: E402
from benchmarks.bench_core import run as run_core  # noqa: E402


def write_chart(results: list[Ratio], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(results) + 1))
    names = [r.name for r in results][::-1]
    ratios = [r.ratio for r in results][::-1]
    ax.barh(names, ratios, color="tab:blue")  # goals differ per figure: see the table
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, x in enumerate(ratios):
        ax.text(x + 0.01, y, f"{x:.3f}", va="center", fontsize=8)
    ax.set_xlabel("ratio (ours / reference), measured side by side; lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The serving (REST / in-process, latency at 1/4/8 clients) and batch (files, spark_udf vs a loop)
# benchmarks start servers and Spark of their own; their printed tables go into RESULTS.md as is.
SCRIPTS = {
    "Serving: REST round trip / in-process predict, latency and throughput": ["bench_serving.py"],
    "Batch: file job and spark_udf vs a loop of single-row predicts": ["bench_batch.py", "--torch-threads", "1"],
    "Inpainting: pyfunc predict vs raw diffusers SDXL inpainting": ["bench_inpaint.py", "--torch-threads", "1"],
}
# These write their own marked section of RESULTS.md (kept below by kept_sections).
SECTION_SCRIPTS = [["bench_controlnet.py", "--torch-threads", "1"], ["bench_parse.py"], ["bench_deadline.py"]]


def run_script(args: list[str]) -> str:
    done = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return "\n".join(lines) if done.returncode == 0 else f"failed (exit {done.returncode}):\n{done.stderr[-2000:]}"


def write_markdown(results: list[Ratio], env: str, path: Path, extra: dict[str, str]) -> None:
    rows = "\n".join(
        f"| {r.name} | {r.ours:.1f} {r.unit} | {r.reference:.1f} {r.unit} | **{r.ratio:.3f}** | {r.goal} |"
        for r in results
    )
    kept = kept_sections(path.read_text()) if path.exists() else ""
    path.write_text(
        f"""# Benchmark results

Written by `python benchmarks/run_all.py` ({env}).
Tiny random-weight models: absolute times mean nothing, the ratios (both sides measured in the
same run, interleaved, medians) are the figures.

| figure | ours | reference | ratio | goal |
|---|---|---|---|---|
{rows}

Full-size SDXL 1.0 (published sizes, by arithmetic on parameter counts): weight bytes with shared
`text_encoder_2` + `vae` / without = **{fullsize_sharing_ratio():.3f}**. With tiny models both
processes are dominated by the ~650 MB of torch/diffusers/transformers code, so figure 4 cannot
show the saving; it shows that sharing costs nothing.

![ratios](ratios.png)
"""
        + "".join(f"\n## {title}\n\n```\n{text}\n```\n" for title, text in extra.items())
        + kept
    )


def kept_sections(text: str) -> str:
    """Sections other scripts wrote between ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers
    (the full-size CPU run takes ~20 minutes: run_all.py keeps its figures rather than rerunning it)."""
    blocks = re.findall(r"<!-- BEGIN [\w.-]+ -->.*?<!-- END [\w.-]+ -->", text, flags=re.DOTALL)
    return "".join(f"\n{block}\n" for block in blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--core-only", action="store_true", help="skip the serving and batch scripts")
    args = parser.parse_args()
    results = run_core(repeats=args.repeats)
    env = environment()
    print(env)
    for r in results:
        print(r.line())
    extra = {}
    for title, script in {} if args.core_only else SCRIPTS.items():
        extra[title] = run_script(script)
        print(f"\n{title}\n{extra[title]}")
    for script in [] if args.core_only else SECTION_SCRIPTS:
        print(f"\n{run_script(script)}")
    write_markdown(results, env, HERE / "RESULTS.md", extra)
    write_chart(results, HERE / "ratios.png")
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'ratios.png'}")


if __name__ == "__main__":
    main()
