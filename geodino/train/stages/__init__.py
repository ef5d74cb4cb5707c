"""The training stages geodino ships (found through geodino.train.stage.STAGES by ``stage.meta_arch``):
`ssl` (pretrain, Gram anchoring, high-resolution adaptation) and `distill` (multi-student distillation). The text
stage (dino.txt) lives with its model in geodino.text.stage."""
