"""bertstream: a gRPC model server for Chinese BERT-wwm embeddings and classification."""
