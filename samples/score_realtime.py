#!/usr/bin/env python
"""Score a running ``mlflow models serve`` endpoint with an Azure ML request body (the SDXL model card shape).

MLflow's scoring server (3.17) accepts only ``dataframe_split`` / ``dataframe_records`` /
``instances`` / ``inputs`` at the top level and answers a bare ``{"input_data": ...}`` with HTTP 400;
it has no hook to accept another shape without a custom server. So the conversion happens here, on
the client: Azure body → ``dataframe_split`` (+ ``params``) → POST → ``{"predictions": [...]}`` →
the Azure response list ``[{"prompt", "generated_image", "nsfw_content_detected"}, ...]``.

  mlflow models serve -m sdxl-model --env-manager local -p 5000 -t 600 &
  python samples/score_realtime.py --azure samples/azure_request.json [--url http://127.0.0.1:5000] [--save out/]

Prints the response list as JSON on stdout (``--short`` abbreviates the base64 images); with
``--save DIR`` writes each image to ``DIR/<row>_<seed>.<ext>``. A 4xx answer is printed on stderr
with the server's message and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requests

from sdxl_tools.client import output_bytes, to_azure_response, to_mlflow_request

EXTENSIONS = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"RIFF": "webp"}


def score(url: str, azure_body: dict | str, timeout: float = 600) -> tuple[list[dict], list[dict]]:
    """(Azure response list, the server's raw prediction rows) for an Azure request body."""
    response = requests.post(f"{url.rstrip('/')}/invocations", json=to_mlflow_request(azure_body), timeout=timeout)
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise RuntimeError(f"HTTP {response.status_code}: {message}")
    rows = response.json()["predictions"]
    return to_azure_response(rows), rows


def save_images(rows: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows):
        if row.get("generated_image") is None:
            continue
        raw = output_bytes(row["generated_image"])
        ext = next((e for magic, e in EXTENSIONS.items() if raw.startswith(magic)), "bin")
        path = folder / f"{i}_{row.get('seed')}.{ext}"
        path.write_bytes(raw)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--azure", required=True, type=Path, help="Azure ML request body (the SDXL model card shape)")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="scoring server base URL")
    parser.add_argument("--save", type=Path, help="folder to write the generated images to")
    parser.add_argument("--short", action="store_true", help="abbreviate base64 images in the printed list")
    parser.add_argument("--timeout", type=float, default=600, help="request timeout, seconds")
    args = parser.parse_args(argv)

    try:
        azure, rows = score(args.url, args.azure.read_text(), timeout=args.timeout)
    except (RuntimeError, requests.RequestException) as e:
        print(f"scoring failed: {e}", file=sys.stderr)
        return 1
    if args.short:
        azure = [{**r, "generated_image": (r["generated_image"] or "")[:32] + "..."} for r in azure]
    print(json.dumps(azure, indent=2))
    if args.save:
        for path in save_images(rows, args.save):
            print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
