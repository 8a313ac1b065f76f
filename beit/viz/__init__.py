"""Pictures of a run (``beit viz RUN_DIR``): masks, token maps, reconstructions, attention, curves,
confusion matrix / segmentation overlays, and the ``index.html`` report that shows them."""
