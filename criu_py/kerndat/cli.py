# click commands of the kerndat feature (kdat, check); registered on the main group by cli.py.


def register(group):
    pass
