"""The YAML defaults, installed as the data package jaxinfer.config_files (jaxinfer.package_data)."""
