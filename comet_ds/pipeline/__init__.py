"""The CoMeT model on DeepSpeed pipeline stages (`stages`), its chunk schedule (`schedule`) and engine (`engine`).

The partition names live here, apart from the modules that import DeepSpeed, so a run config checks its
pipeline.partition without loading DeepSpeed.
"""

# pipeline.partition -> DeepSpeed's partition_method: balance decoder layers, trainable parameters, or
# pipeline layers of any kind
PARTITION_METHODS = {"layers": "type:CometLayerPipe", "parameters": "parameters", "uniform": "uniform"}
