"""Every stage's way out, publish: the Hub-layout dataset folder, the cards, and the one module that talks to the Hub.

``folder.py`` writes a protected dataset as parquet shards plus card, ``cards.py`` renders model and
dataset cards from templates (``templates/``), ``hub.py`` creates repos, checks write access and
uploads.
"""
