"""`python -m diffcse_export` = `diffcse-export`."""

from diffcse_export.cli import main

if __name__ == "__main__":
    main(prog_name="diffcse-export")
