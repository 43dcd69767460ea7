"""``python -m sep_hf COMMAND`` / ``accelerate launch -m sep_hf COMMAND``: the ``sep-hf`` command."""

from sep_hf.cli import main

main()
