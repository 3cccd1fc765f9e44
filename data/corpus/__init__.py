"""The text corpus, installed as the data package jaxinfer.corpus_files (jaxinfer.package_data)."""
