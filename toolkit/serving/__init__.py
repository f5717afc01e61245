"""`toolkit serve`: the Open Inference Protocol on KServe's server, batching, workers, launching servers."""
