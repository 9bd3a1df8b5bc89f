"""``python -m app.cli``: the ``lenslab`` command."""

from app.cli import main

if __name__ == "__main__":
    main()
