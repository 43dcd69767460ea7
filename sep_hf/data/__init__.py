"""Stage 1 of 4, data: an owner's image-classification dataset, read as it is published.

``load.py`` finds the dataset and its image / label columns, ``images.py`` converts images to
tensors and back, ``view.py`` gives the models' view of a split (bounded memory at any size).
"""
