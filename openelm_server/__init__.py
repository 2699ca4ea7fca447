"""An HTTP server for OpenELM-3B-Instruct. Layers, each importing only those before it: model/ (OpenELM
itself), engine/ (requests to tokens), serving/ (HTTP); config.py, startup.py and demo.py wire them."""
