"""Other projects' trainers behind this project's signatures, so that a study compares them on equal terms."""
