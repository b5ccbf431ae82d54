"""``python -m depthcompress``: the ``depthcompress`` command, also as ``torchrun -m
depthcompress`` where the console script is a shell shim (pyenv) that torchrun cannot run."""

from .cli import app

app(prog_name="depthcompress")
