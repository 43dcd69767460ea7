"""Stage 4 of 4, victim: the appropriator's model, trained on the protected data and measured on clean data.

``trainer.py`` trains a timm model through transformers' ``Trainer`` (from scratch, fine-tuned from
pretrained weights, or as a linear probe) with a registered defense (``sep_hf.defenses``);
``job.py`` is the ``train-victim`` job (card with the accuracy, row in the dataset card).
"""
