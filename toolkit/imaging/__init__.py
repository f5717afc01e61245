"""Any picture or drawing to the 28x28 the model expects: decoding with limits, the training
set's framing, the paper cleared away, preprocessing."""
