"""The serving runtime of the SDXL artifact: everything ``load_context`` and ``predict`` need, nothing
else. It is the artifact's only ``code_paths`` entry; build and operations tools live in ``sdxl_tools``."""
