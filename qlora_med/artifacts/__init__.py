"""What training leaves on disk and what is made of it: the run folder (``run_dir``), a stage's trainable state
(``adapter``), loading it for generation (``load``), safetensors shards (``shards``), merging into a full model
(``merge``), exports (``export``, ``gguf``), model cards (``card``) and pushing to the Hub (``hub``)."""
