"""The health check of docker/webui.Dockerfile: healthy once the WebUI answers on Embedding Trainer's API, which it
adds only after start-up has finished. 401 counts as an answer (the WebUI was started with --api-auth)."""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('WEBUI_PORT', '7860')}/embtrain/v1/runs"
try:
    with urllib.request.urlopen(url, timeout=8) as response:
        sys.exit(0 if response.status == 200 else 1)
except urllib.error.HTTPError as error:
    sys.exit(0 if error.code == 401 else 1)
except OSError:
    sys.exit(1)
