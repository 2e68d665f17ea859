"""`sglgym bench`: engine throughput of our route next to SGLang's own (shipped with the package)."""
