"""The handoff to serving: candidate versions, an evaluation gate, shadow scoring, promote and roll back.

`load_production(model, store=...)` is what serving code needs: the model's
production version from the artifact store, verified (checksums, HMAC when keyed)
before anything is unpickled, ready to predict. The rest runs inside the service
(`handoff`) and behind `streamlearn models` (`registry`, `publisher`).
"""

from streamlearn.deploy.artifacts import ArtifactError
from streamlearn.deploy.loader import load_production, load_version
from streamlearn.deploy.model_files import Deployed

__all__ = ["ArtifactError", "Deployed", "load_production", "load_version"]
