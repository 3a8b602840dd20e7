"""Small shared helpers: atomic files, command-line errors, output paths, runtime set-up."""
