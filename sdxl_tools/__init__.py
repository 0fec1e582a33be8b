"""Build and operations tools around the SDXL artifact: packaging, registry + gate, batch job, Spark,
clients, random-weight builders. They import the runtime (``model_pkg``); it never imports them, and
none of this package is shipped inside the artifact."""
