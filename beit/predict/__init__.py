"""``beit predict``: a fine-tuned model (run folder, exported .safetensors or .onnx) over a folder of images or
shards, with the model's own evaluation preprocessing (imported as ``beit.predict``).

* ``models``: the model of any of the three forms, its classes and its recorded preprocessing;
* ``inputs``: the folder / shards, their labels, decoding as the held-out evaluation does, in batches;
* ``run``: the predictions CSV, the error list, the summary, the confusion matrix or the masks;
* ``command``: the ``beit predict`` entry point.
"""
