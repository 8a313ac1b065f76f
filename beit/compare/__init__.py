"""``beit compare``: does BEiT pretraining pay off on this data? (see ``beit.compare.run``)"""
