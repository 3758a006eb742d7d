"""`livetalk export` and `--engine`: the export contracts (contract), building and running each format
(backends, tensorrt), engine folders and their checks (manifest), the export command's library
(build), and the exported components in the streaming loop (load, runtime)."""
