"""Pretraining on clips streamed from the shards: the clip loader (``data``), objectives
(``objectives``), the Ray Train loop (``loop``) and the graph stage (``stage``)."""
