"""The command-line verbs that orchestrate library parts (the top layer, beside geodino.cli): `curate`, `export`.
`train`, `eval` and `segment` have their entry points in their own packages (geodino.train.run, geodino.eval.run,
geodino.segment.run)."""
