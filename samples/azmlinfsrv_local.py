"""``azmlinfsrv`` bound to 127.0.0.1, for running Azure's inference server on your own machine (and in the tests):
azureml-inference-server-http 1.5.1 hands gunicorn ``-b 0.0.0.0:PORT`` and has no option for the host.
Same arguments as ``azmlinfsrv``: ``python samples/azmlinfsrv_local.py --entry_script deploy/azureml/score.py``."""

import sys

from azureml_inference_server_http import constants

constants.DEFAULT_HOST = "127.0.0.1"  # amlserver copies it at import (`from .constants import ...`)
from azureml_inference_server_http import amlserver  # noqa: E402

sys.exit(amlserver.run())
