"""Scripts for a CUDA machine: quality.sh, demo_grid.sh, serve.sh (see session.sh)."""
