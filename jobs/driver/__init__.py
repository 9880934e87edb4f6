"""What the training driver decides before Ray starts: the checks of data, storage and the parent net (``preflight``), and whether a run name resumes (``resume``)."""
