"""The options of each stage, as dataclasses (see beit.config for how they are parsed)."""
