"""What the recipe leans on: settings from the command line (cli), the run folder and its checkpoints
(checkpoint), how a run is measured (evaluation), how the model is spread over ranks (parallel), and the plots
of a run (plot). Imported by train.py, sample.py and the tools; never by the concept files."""
