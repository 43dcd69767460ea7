"""Stage 2 of 4, source: train one model and keep its checkpoints (the self-ensemble SEP crafts with).

``recipe.py`` the training recipe (shared with victims), ``augment.py`` batched crop/flip,
``train.py`` the accelerate loop, ``checkpoints.py`` atomic checkpoint folders, ``job.py`` the
``train-source`` job (resume, private Hub pushes, card).
"""
