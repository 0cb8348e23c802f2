from streamlearn.cli import app

app()
