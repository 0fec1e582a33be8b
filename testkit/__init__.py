"""What the tests and benchmarks share: tiny inputs and decoders (``helpers``), child processes
(``processes``), a real ``mlflow models serve`` (``scoring_server``) and the serving platforms'
virtualenvs (``platforms``). Installed with the project (editable), never shipped in the artifact."""
