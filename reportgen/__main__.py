from .cli import main

if __name__ == "__main__":  # guarded: the PDF worker process imports this module under spawn
    main()
