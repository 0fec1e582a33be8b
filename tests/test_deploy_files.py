"""The deploy files agree with the artifact and with what the platform tests run (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from sdxl_tools.artifact import requirements
from testkit.platforms import DEPLOY, ROOT


def pins(path: Path) -> list[str]:
    return [line for line in path.read_text().split("\n") if line.strip() and not line.startswith("#")]


def test_azure_environment_is_the_server_then_the_artifacts_requirements():
    environment = yaml.safe_load((DEPLOY / "azureml" / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    server = next(p for p in pins(DEPLOY / "azureml" / "server-packages.txt") if p.startswith("azureml-inference"))
    assert pip == [server, *requirements()]


def test_azure_deployment_uploads_only_its_own_folder():
    """The code folder is ``deploy/azureml`` (the scoring script needs only itself and the model), not the
    repository, which an Azure deploy from a working copy would upload whole with any artifact built in it."""
    deployment = yaml.safe_load((DEPLOY / "azureml" / "deployment.yml").read_text())
    code = (DEPLOY / "azureml" / deployment["code_configuration"]["code"]).resolve()
    assert code == (DEPLOY / "azureml").resolve()
    assert (code / deployment["code_configuration"]["scoring_script"]).is_file()
    assert (DEPLOY / "azureml" / deployment["environment"]["conda_file"]).is_file()


def test_the_artifact_carries_mlserver_settings_that_point_back_at_it(artifact):
    folder = artifact / "artifacts" / "mlserver"
    settings = json.loads((folder / "model-settings.json").read_text())
    assert (folder / settings["parameters"]["uri"]).resolve() == artifact.resolve()
    module, cls = settings["implementation"].rsplit(".", 1)
    assert f"class {cls}(" in (folder / f"{module}.py").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["model-settings.json", f"{module}.py"]


def test_kserve_manifests_name_the_runtime_and_the_image_layers_match_the_tested_ones():
    runtime, service = (
        yaml.safe_load((DEPLOY / "kserve" / f).read_text()) for f in ("serving-runtime.yaml", "inference-service.yaml")
    )
    model = service["spec"]["predictor"]["model"]
    settings = json.loads((DEPLOY / "mlserver" / "model-settings.json").read_text())
    assert service["metadata"]["name"] == settings["name"]  # POST /v2/models/sdxl/infer
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    dockerfile = (DEPLOY / "kserve" / "Dockerfile").read_text()
    torch = next(r for r in requirements() if Requirement(r).name == "torch")
    assert f"pip install --no-cache-dir {torch}\n" in dockerfile
    assert "deploy/kserve/server-packages.txt MLmodel_template/requirements.txt" in dockerfile


def test_the_docs_show_the_kserve_and_mlserver_files_as_they_are():
    readme = (ROOT / "docs" / "deploy-mlserver.md").read_text()
    for path in ("kserve/inference-service.yaml", "kserve/serving-runtime.yaml", "mlserver/model-settings.json"):
        text = (DEPLOY / path).read_text()
        assert f"\n{text}```" in readme, path
