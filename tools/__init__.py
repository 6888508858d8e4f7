"""The tools that drive the recipe, each run from the repository's root as `python -m tools.<name>`: the
experiments behind the README's claims (experiment), the side-by-side benchmarks (bench, bench_nanogpt,
bench_serving) and the check of every CUDA path on a GPU (gpu_check)."""
