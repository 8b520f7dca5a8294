"""``python -m fedcrypt.cli``: the same as the ``fedcrypt`` command."""

from fedcrypt.cli.main import main

main()
