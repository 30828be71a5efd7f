"""Side-by-side benchmarks: each compares the project's code with a plain baseline in one run."""
