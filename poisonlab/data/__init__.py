"""Clean data sources and the chat formatting shared by training and evaluation."""
