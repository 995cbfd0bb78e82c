"""The Hugging Face hub side of grokconv: what a download writes and how it is checked afterwards.

- ``manifest``: the download manifest (``DIR/.grokconv/manifest.json``), every field checked on read;
- ``verify``: ``grokconv verify`` (a download against its manifest, a safetensors directory through the
  safetensors reader's own validation);
- ``progress``: the byte bar shared by threads.

Planning and fetching are in ``grokconv.download`` (it imports these; they import nothing of it).
"""
