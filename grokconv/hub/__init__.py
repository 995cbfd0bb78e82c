"""The Hugging Face hub side of grokconv, one concern per module:

- ``client``: hub calls (the commit a revision names, a repository's files and their hashes) and every
  huggingface_hub / network exception as one ``DownloadError``;
- ``fetch``: each file through ``huggingface_hub.hf_hub_download``, hashed, fsync'd, renamed; the ledger;
- ``manifest``: the download manifest (``DIR/.grokconv/manifest.json``), every field checked on read;
- ``verify``: ``grokconv verify`` (a download against its manifest, a safetensors directory through the
  safetensors reader's own validation);
- ``progress``: the byte bar shared by threads.

The plan (which files a layer slice needs) and the driver are ``grokconv.download``; nothing here imports it.
"""
