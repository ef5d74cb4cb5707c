"""dino.txt text alignment: a frozen backbone + trainable vision head blocks + an open_clip text tower
(geodino.text.dinotxt), image–caption data (geodino.text.data) and the `stage=text` trainer (geodino.text.train)."""
