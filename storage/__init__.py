"""The project's storage layer: how durable files are written (``storage.files``) and the one
definition of the preprocessed dataset's on-disk format (``storage.dataformat``). Imports the
standard library and pyarrow only, so preprocessing/, pipeline/ and jobs/ can all use it."""
