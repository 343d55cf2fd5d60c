"""Files on disk: atomic writes and format sniffing, resumable run state, the safetensors layout."""
