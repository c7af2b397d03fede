"""`python -m diffcse_train` is `diffcse-train`."""

from diffcse_train.cli import main

if __name__ == "__main__":
    main()
