"""Stage 5: tables, plots and analyses of a study, and the search-speed benchmark."""
