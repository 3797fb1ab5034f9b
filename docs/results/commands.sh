tinylm train aurelius-4m --set train.max_steps=595 --set train.max_minutes=6.0 --set train.eval_interval=59 --set train.eval_batches=10 --set train.checkpoint_interval=119 --set train.log_interval=11 --set train.warmup_steps=59 --out runs/results/aurelius-4m --quiet
tinylm eval runs/results/aurelius-4m
tinylm card runs/results/aurelius-4m
tinylm train aurelius-10m --set train.batch_size=16 --set train.max_steps=206 --set train.max_minutes=6.0 --set train.eval_interval=20 --set train.eval_batches=10 --set train.checkpoint_interval=41 --set train.log_interval=4 --set train.warmup_steps=20 --out runs/results/aurelius-10m --quiet
tinylm eval runs/results/aurelius-10m
tinylm card runs/results/aurelius-10m
tinylm train aurelius-10m --set train.batch_size=16 --set model.vocab_size=4096 --set tokenizer.vocab_size=4096 --set train.max_steps=186 --set train.max_minutes=6.0 --set train.eval_interval=18 --set train.eval_batches=10 --set train.checkpoint_interval=37 --set train.log_interval=3 --set train.warmup_steps=18 --out runs/results/aurelius-10m-vocab4096 --quiet
tinylm eval runs/results/aurelius-10m-vocab4096
tinylm card runs/results/aurelius-10m-vocab4096
tinylm train simpler-llama-834k --set train.warmup_steps=100 --set train.lr=1e-3 --set train.max_steps=389 --set train.max_minutes=6.0 --set train.eval_interval=38 --set train.eval_batches=10 --set train.checkpoint_interval=77 --set train.log_interval=7 --set train.warmup_steps=38 --out runs/results/simpler-llama-834k --quiet
tinylm eval runs/results/simpler-llama-834k
tinylm card runs/results/simpler-llama-834k
tinylm train micromixer-1m --set train.lr=1e-3 --set train.max_steps=771 --set train.max_minutes=6.0 --set train.eval_interval=77 --set train.eval_batches=10 --set train.checkpoint_interval=154 --set train.log_interval=15 --set train.warmup_steps=77 --out runs/results/micromixer-1m --quiet
tinylm eval runs/results/micromixer-1m
tinylm card runs/results/micromixer-1m
tinylm train llama2c-260k --set train.batch_size=32 --set train.max_steps=76 --set train.max_minutes=6.0 --set train.eval_interval=7 --set train.eval_batches=10 --set train.checkpoint_interval=15 --set train.log_interval=1 --set train.warmup_steps=7 --out runs/results/llama2c-260k --quiet
tinylm eval runs/results/llama2c-260k
tinylm card runs/results/llama2c-260k
tinylm compare runs/results/aurelius-4m runs/results/aurelius-10m runs/results/aurelius-10m-vocab4096 runs/results/simpler-llama-834k runs/results/micromixer-1m runs/results/llama2c-260k --plot runs/results/compare.png
