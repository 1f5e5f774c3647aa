# The WebUI imports every file in scripts/; this one only hands over to the extension's glue.
from embedding_trainer.webui.extension import register

register()
